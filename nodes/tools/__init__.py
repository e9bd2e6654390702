"""Tools near their data: a decorator that turns typed Python functions into tools, and the built-ins.

    from nodes.tools import ToolContext, tool

    @tool(idempotent=True, data=("inventory",))
    def stock_level(sku: str, context: ToolContext) -> dict:
        '''How many units of a product are in stock.

        Args:
            sku: the product code.
        '''
        ...

The schema the model's arguments must match comes from the type hints; the
descriptions from the docstring. `idempotent` says whether the tool may run
again safely (after a failover, a non-idempotent tool is never re-run); `data`
names the datasets the tool needs, which a node must hold to offer it.
"""

from nodes.tools._core import (
    Tool,
    ToolAccessDenied,
    ToolContext,
    ToolError,
    ToolExample,
    ToolRegistry,
    load_module_objects,
    tool,
)
from nodes.tools._schema import SchemaError, parameters_schema, parse_docstring, validate
from nodes.tools.builtin import BUILTIN_TOOLS
from nodes.tools.store import DATASETS, DemoStore


def builtin_registry() -> ToolRegistry:
    """A registry holding the built-in tools."""
    return ToolRegistry(BUILTIN_TOOLS)


__all__ = [
    "BUILTIN_TOOLS",
    "DATASETS",
    "DemoStore",
    "SchemaError",
    "Tool",
    "ToolAccessDenied",
    "ToolContext",
    "ToolError",
    "ToolExample",
    "ToolRegistry",
    "builtin_registry",
    "load_module_objects",
    "parameters_schema",
    "parse_docstring",
    "tool",
    "validate",
]
