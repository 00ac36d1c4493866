"""``python -m ltclip`` (also what ``torchrun -m ltclip`` runs)."""

from .cli import main

main()
