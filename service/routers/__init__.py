"""HTTP routes, one module per resource; each is thin: validate, resolve, enqueue, shape the reply."""
