"""Private fine-tuning of Mistral-family checkpoints: chat / tool / text data to masked examples, LoRA adapters
in the PEFT layout, and the DP-SGD run that trains them (`tramontane finetune`)."""
