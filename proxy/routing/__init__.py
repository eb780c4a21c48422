"""Which version answers: strategies and sticky hashing (pure), and the progressive rollout."""
