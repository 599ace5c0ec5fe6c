"""Publishing to the Hugging Face Hub: the dataset and model cards (rendered from the templates
in the top-level ``hub/`` folder) and the uploads (``push``)."""
