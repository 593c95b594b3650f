"""Request and response models of the API (pydantic), one module per area."""
