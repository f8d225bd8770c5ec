"""FederatedRound: the round's aggregator, cohort selection and lifecycle."""
