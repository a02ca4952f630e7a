"""Ray jobs that wire the grounding library into Ray Data."""
