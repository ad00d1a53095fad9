"""Tests never reach the network: the Hugging Face Hub endpoint points at a closed local port.

Set before huggingface_hub is imported, so that it holds in this process and in every
subprocess a test starts. Download tests start their own stand-in Hub (tests/fake_hub.py)
and point the client at it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from fake_hub import closed_port_url  # noqa: E402

os.environ["HF_ENDPOINT"] = closed_port_url()
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if "huggingface_hub.constants" in sys.modules:  # imported by a plugin before this file
    from huggingface_hub import constants

    constants.ENDPOINT = os.environ["HF_ENDPOINT"]
    constants.HUGGINGFACE_CO_URL_TEMPLATE = constants.ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}"
