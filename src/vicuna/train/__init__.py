"""`vicuna train`: fine-tune a chat model on your own conversations, with the loss on assistant turns only."""
