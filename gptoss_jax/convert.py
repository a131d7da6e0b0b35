"""`python -m gptoss_jax.convert SRC DST [--to hf] [--force] [--dry-run]`: see
`gptoss_jax.converters.convert` (the code) and docs/conversion.md (the format)."""

import sys

from gptoss_jax.converters.convert import main

if __name__ == "__main__":
    sys.exit(main())
