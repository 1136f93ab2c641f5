"""Model C, the built-in coupled homeostasis model, used through the same public API as any user model."""

from models import coupled_model


model = coupled_model()
