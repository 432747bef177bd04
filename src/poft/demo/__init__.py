"""The embedded default: `poft demo` and `poft quickstart`, on tiny models built here, on a CPU.

The demo never quantizes and never runs DeepSpeed, but where bitsandbytes and DeepSpeed are installed (the test
set-up installs both) their imports log notices about CPU kernels and accelerator detection that would be the
first lines a new user reads. They are held below ERROR for the demo's processes (its workers import this package
too); `poft train`, `score` and the rest keep every library's warnings.
"""

from __future__ import annotations

import logging

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# DeepSpeed sets its own logger's level when imported, so a filter (which it keeps) holds its warnings back
logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
