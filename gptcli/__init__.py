"""gptcli: run and understand GPT-2 from the command line."""

__version__ = "0.1.0"
