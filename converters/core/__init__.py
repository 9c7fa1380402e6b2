"""The mapping core: rules and invertible transforms (`mapping`, `transforms`), the family registry, the direction of
a conversion."""
