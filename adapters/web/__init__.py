"""The web pages (confirm a challenge by link, review one recipient's quarantine), served by
`sourceauth serve` in a process of its own when `[web] listen` is set; see docs/web.md."""
