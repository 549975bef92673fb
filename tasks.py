"""A site folder's tasks: `invoke setup`, `invoke facts`, ... are xenrun's own."""

from xenrun.tasks import ns  # noqa: F401
