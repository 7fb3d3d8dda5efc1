"""The pipeline every listener composes, knowing no listener: the request and connection
context, the reason vocabulary, admission past the limits, and the one place an outcome
becomes an audit record and metrics."""
