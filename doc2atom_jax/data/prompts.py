"""The one short-answer prompt shared by every method, so methods differ only in where the document is.

`in_context` puts the document in the user turn; adapter methods (doc2atom, d2l) get the question alone.
No system prompt: the chat template's default one would lengthen every student prompt for nothing.
"""

INSTRUCTION = "Answer with a few words only."


def question_prompt(question: str) -> str:
  """The student's user turn: the question alone."""
  return f"{question.strip()}\n{INSTRUCTION}"


def in_context_prompt(document: str, question: str) -> str:
  """The teacher's user turn: the document, then the question."""
  return f"{document.strip()}\n\nQuestion: {question.strip()}\n{INSTRUCTION}"
