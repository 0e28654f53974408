"""Drop-in glue for TRL, verl and OpenRLHF; each module imports its trainer lazily."""
