"""rlkern.nn.LinearLogprobs and rlkern.integrations.transformers.patch_causal_lm: the log-probs a
tiny HF model gives through its own logits, without the logits."""

import pytest
import torch

import rlkern
from rlkern.nn import LinearLogprobs

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency via requirements/peers.txt")
from rlkern.integrations.transformers import patch_causal_lm, unpatch_causal_lm  # noqa: E402


def _tiny(kind):
    common = dict(vocab_size=301, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    elif kind == "gemma2":  # final_logit_softcapping, tied embeddings
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, tie_word_embeddings=True)
        cls = transformers.Gemma2ForCausalLM
    else:  # granite: logits divided by logits_scaling
        config = transformers.GraniteConfig(**common, logits_scaling=4.0)
        cls = transformers.GraniteForCausalLM
    torch.manual_seed(0)
    return cls(config).float().eval()


def _own_logprobs(model, input_ids, attention_mask, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double() / temperature
    log_p = torch.log_softmax(logits, -1)
    labels = input_ids[:, 1:]
    return log_p.gather(-1, labels[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])
def test_patched_model_matches_its_own_logits(kind):
    model = _tiny(kind)
    input_ids = torch.randint(0, 301, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    ref_logp, ref_entropy = _own_logprobs(model, input_ids, attention_mask, 0.8)
    ref_logp.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    patch_causal_lm(model, temperature=0.8, return_entropy=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logprob_labels=input_ids)
    assert out.logprobs.shape == (3, 10) and out.entropy.shape == (3, 10)
    torch.testing.assert_close(out.logprobs.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_entropy, rtol=0, atol=1e-5)
    out.logprobs.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_grads[name].double(), rtol=1e-3, atol=1e-5, msg=name)
    # Calls without labels still reach the original forward (generation), and unpatching restores it.
    assert model(input_ids=input_ids).logits.shape == (3, 11, 301)
    shift_labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # HF's shifted layout
    shifted = model(input_ids=input_ids, attention_mask=attention_mask, shift_labels=shift_labels,
                    return_entropy=False)
    assert shifted.logprobs.shape == (3, 11) and shifted.entropy is None and (shifted.logprobs[:, -1] == 0).all()
    torch.testing.assert_close(shifted.logprobs[:, :-1], out.logprobs.detach(), rtol=0, atol=1e-6)
    unpatch_causal_lm(model)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_causal_lm(model)


def test_linear_logprobs_module_shares_the_head():
    head = torch.nn.Linear(16, 97, bias=True)
    module = LinearLogprobs(head, temperature=0.7, return_entropy=True)
    hidden, labels = torch.randn(2, 5, 16), torch.randint(0, 97, (2, 5))
    logp, entropy = module(hidden, labels)
    ref = rlkern.token_logprobs(head(hidden), labels, temperature=0.7, return_entropy=True)
    torch.testing.assert_close(logp, ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref[1], rtol=0, atol=1e-5)
    logp.sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert module(hidden, labels, return_entropy=False).shape == (2, 5)
    with pytest.raises(TypeError, match="unknown options"):
        module(hidden, labels, temprature=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearLogprobs(torch.nn.Embedding(3, 4))


def test_patched_model_refuses_trls_fused_head_protocol():
    """TRL's trainers call model(..., fused_lm_head=True) and read .log_probs: a patched model says
    so instead of silently running another head (rlkern.integrations.trl.patch() is the tool there)."""
    model = patch_causal_lm(_tiny("llama"))
    input_ids = torch.randint(0, 301, (2, 7))
    with pytest.raises(ValueError, match="^patch_causal_lm: got fused_lm_head=.*rlkern.integrations.trl.patch"):
        model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    with pytest.raises(ValueError, match="^patch_causal_lm: got fused_lm_head="):
        model(input_ids=input_ids, labels=input_ids, fused_lm_head=False)
    # Wrapped by TRL afterwards (a trainer's init): TRL's fused calls would bypass the patch, so
    # every call that still reaches it says so.
    from conftest import import_peer

    trl_utils = import_peer("trl.trainer.utils")
    trl_utils.add_fused_lm_head(model)
    with pytest.raises(ValueError, match="^patch_causal_lm: TRL's add_fused_lm_head wrapped"):
        model(input_ids=input_ids)


def test_logits_dtype_reaches_the_op():
    """LinearLogprobs and patch_causal_lm forward logits_dtype (defaults and per call) to
    linear_token_logprobs: the same numbers as the op called with it, not those without it."""
    head = torch.nn.Linear(16, 97, bias=True)
    module = LinearLogprobs(head, logits_dtype=torch.bfloat16)
    hidden, labels = torch.randn(2, 5, 16), torch.randint(0, 97, (2, 5))
    rounded = rlkern.linear_token_logprobs(hidden, head.weight, labels, bias=head.bias, logits_dtype=torch.bfloat16)
    exact = rlkern.linear_token_logprobs(hidden, head.weight, labels, bias=head.bias)
    assert not torch.equal(rounded, exact)
    assert torch.equal(module(hidden, labels), rounded)
    assert torch.equal(module(hidden, labels, logits_dtype=None), exact)

    model = _tiny("llama")
    input_ids = torch.randint(0, 301, (2, 9))
    with torch.no_grad():
        last = model.base_model(input_ids=input_ids).last_hidden_state[:, :-1]
        head = model.get_output_embeddings()
        rounded = rlkern.linear_token_logprobs(last, head.weight, input_ids[:, 1:], logits_dtype=torch.bfloat16)
        exact = rlkern.linear_token_logprobs(last, head.weight, input_ids[:, 1:])
        patch_causal_lm(model, logits_dtype=torch.bfloat16)
        assert torch.equal(model(input_ids=input_ids, logprob_labels=input_ids).logprobs, rounded)
        assert torch.equal(model(input_ids=input_ids, logprob_labels=input_ids, logits_dtype=None).logprobs, exact)
    unpatch_causal_lm(model)
