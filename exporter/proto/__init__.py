"""Generated protobuf code for step-runner's `proto/step.proto` (see regenerate.py)."""
