"""The model lifecycle: the MLflow model registry for stage outputs (:mod:`.registry`), and promotion and rollout
of registered versions."""
