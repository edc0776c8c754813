"""Request and response formats: our native JSON API and the OpenAI API, routing by url_path, streamed text."""
