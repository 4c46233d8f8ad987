"""Generative models. Pure torch: nothing here imports deepspeed, ray or mlflow."""
