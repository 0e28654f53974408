"""What ``rlkern bench`` runs: one list of (result name, arguments) per family.

The quick suite (the default, a few minutes on 2 CPU cores) uses small shapes and few rounds;
``--full`` runs the shapes behind the committed results (benches/results/<device>/NAME.json,
each file records its command). On a GPU both use the GPU shapes of each bench's defaults.
"""

from __future__ import annotations

FAMILIES = ("logprobs", "linear_logprobs", "policy_loss", "advantages", "trees", "preference", "linear_losses",
            "linear_preference")

_CPU_QUICK = {
    "logprobs": [("logprobs", ["--n", "1024", "--rounds", "5", "--memory-n", "512,1024,2048"])],
    "linear_logprobs": [("linear_logprobs", ["--n", "2048", "--rounds", "3", "--no-memory",
                                             "--memory-n", "512,1024,2048"])],
    "policy_loss": [("policy_loss", ["--b", "16", "--t", "2048", "--rounds", "9"]),
                    ("policy_loss_from_logits", ["--from-logits", "--b", "2", "--t", "128", "--rounds", "5"])],
    "advantages": [("advantages", ["--batch", "64", "--steps", "2048", "--samples", "8192", "--rounds", "3"])],
    "trees": [("trees", ["--trees", "512", "--rounds", "3", "--python-rounds", "1"])],
    "preference": [("preference", ["--rounds", "9"])],
    "linear_preference": [("linear_preference", ["--pairs", "2", "--t", "256", "--vocab", "4000", "--rounds", "3",
                                                  "--no-memory"])],
    "linear_losses": [("linear_losses", ["--n", "1024", "--t", "128", "--vocab", "4000", "--rounds", "3",
                                         "--no-memory"])],
}

_FULL = {
    "logprobs": [("logprobs", ["--memory-n", "1024,2048,4096,8192"])],
    "linear_logprobs": [("linear_logprobs", ["--rounds", "3", "--memory-n", "1024,2048,4096,8192"]),
                        ("linear_logprobs_bf16", ["--rounds", "3", "--dtype", "bf16"]),
                        ("linear_logprobs_fp64", ["--rounds", "3", "--dtype", "fp64", "--n", "2048", "--no-memory"]),
                        ("linear_logprobs_autocast", ["--rounds", "3", "--autocast", "--n", "2048"])],
    "policy_loss": [("policy_loss", []), ("policy_loss_bf16", ["--dtype", "bf16"]),
                    ("policy_loss_gspo", ["--loss", "gspo"]), ("policy_loss_geo_mean", ["--loss", "geo_mean"]),
                    ("policy_loss_from_logits", ["--from-logits"]), ("policy_loss_kl_aggregate", ["--kl-aggregate"])],
    "advantages": [("advantages", [])],
    "trees": [("trees", [])],
    "preference": [("preference", []), ("preference_large", ["--pairs", "64", "--t", "4096", "--rounds", "9"])],
    # the CPU's DPO batch: 2 pairs x 512 positions (4 x 1024 takes minutes per implementation on 2 cores)
    "linear_preference": [("linear_preference", ["--pairs", "2", "--t", "512", "--rounds", "3"]),
                          ("linear_preference_kto", ["--loss", "kto", "--pairs", "2", "--t", "512", "--rounds", "3"])],
    "linear_losses": [("linear_losses", ["--rounds", "3"]),
                      ("linear_losses_bf16", ["--dtype", "bf16", "--rounds", "1"])],
}

_GPU_QUICK = {
    "logprobs": [("logprobs", ["--memory-n", "2048,8192,32768"])],
    "linear_logprobs": [("linear_logprobs", ["--memory-n", "2048,8192,32768"])],
    "policy_loss": [("policy_loss", [])],  # on a GPU it adds the from-logits table (Liger's GRPO loss)
    "advantages": [("advantages", [])],
    "trees": [("trees", [])],
    "preference": [("preference", [])],
    "linear_preference": [("linear_preference", [])],
    "linear_losses": [("linear_losses", [])],
}


def runs(family: str, *, full: bool, cuda: bool) -> list[tuple[str, list[str]]]:
    """The (result name, argv of ``rlkern.benches.bench_FAMILY.main``) runs of one family."""
    suite = _FULL if full else _GPU_QUICK if cuda else _CPU_QUICK
    return suite[family]
