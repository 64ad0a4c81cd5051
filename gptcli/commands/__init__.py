"""The CLI commands: each parses its options, calls library code and renders the result."""
