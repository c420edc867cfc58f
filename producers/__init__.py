"""Publishing prompt batches and replaying logged runs onto the prompts topic."""
