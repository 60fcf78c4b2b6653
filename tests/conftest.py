"""Set-up shared by the whole suite: it never contacts the Hugging Face Hub.

TRL's trainers send a telemetry request to the Hub when they are built (from a background thread);
``HF_HUB_DISABLE_TELEMETRY`` turns that off, here and in the processes the tests launch.
"""

import os

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
