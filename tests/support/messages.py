"""What every error message a person reads must look like."""


def is_a_sentence(message: object) -> bool:
    """A capitalised sentence with a full stop, not shouted: what a front end can show as-is."""
    return (
        isinstance(message, str)
        and message[:1].isupper()
        and message.endswith(".")
        and not message.isupper()
    )
