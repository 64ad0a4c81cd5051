"""``gptcli serve``: OpenAI's completions API over the continuous-batch engine, and the playground page."""
