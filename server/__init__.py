"""edgediff serve: a local image server (OpenAI images API, AUTOMATIC1111 API, a web page)."""
