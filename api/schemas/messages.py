"""Chat messages as OpenAI sends them (text only), normalised to ``{"role", "content"}``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGES = 1024


class TextPart(BaseModel):
    """One text part of a message's content."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str = Field(max_length=10_000_000)


class ChatMessage(BaseModel):
    """A message of a conversation. ``content`` is a string or a list of text parts (images and
    audio are not supported)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=10_000_000)] | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def plain(self) -> dict[str, str]:
        """``{"role", "content"}`` with the parts joined; a developer message is a system one."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
