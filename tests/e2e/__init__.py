"""End-to-end tests through a real Postfix on loopback (set up by .ci/postfix-setup.sh)."""
