"""cc50-echo: a cc50tw backend that streams the prompt back."""
