"""TrainingJob: gang admission and restarts, checkpoint orchestration, the trainer report endpoint."""
