"""Publishing minrnn checkpoints to the Hugging Face Hub: ``push_to_hub.py`` (CLI + :func:`push_checkpoint`)."""
