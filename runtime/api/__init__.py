"""The job API users write against: streams, functions, operators, sources and sinks, testing utilities."""
