"""Studies of the checkpoint policy and the save-stall benchmark."""
