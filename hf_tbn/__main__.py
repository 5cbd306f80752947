"""``python -m hf_tbn ...`` is ``hf-tbn ...`` (and ``accelerate launch -m hf_tbn train ...`` runs it under DDP)."""

import sys

from .cli import main

sys.exit(main())
