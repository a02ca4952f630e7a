"""CogVLM-style visual-expert model, stage-two trainer and REC evaluation."""
