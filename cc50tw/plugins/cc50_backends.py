"""cc50tw's own backends, registered exactly as a third party's would be."""

from cc50tw.backends.llama_server import SPEC as llama_server
from cc50tw.backends.openai import SPEC as openai
from cc50tw.backends.toy import SPEC as toy

__all__ = ["llama_server", "openai", "toy"]
