"""The PAPO objective: config, advantages and the loss."""
