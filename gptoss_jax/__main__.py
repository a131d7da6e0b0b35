"""`python -m gptoss_jax` is `python -m gptoss_jax.generate`."""

import sys

from gptoss_jax.generate import main

sys.exit(main())
