"""jpaged's OpenAI-compatible HTTP server: `serve.app.build_app(engine, name)`, run by
`python -m jpaged.serve`."""
