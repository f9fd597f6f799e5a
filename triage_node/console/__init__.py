"""The web console: static pages (HTML, CSS, ES modules) served by the node, and the PNG
previews of result objects it shows. All data comes from the token-protected API."""
