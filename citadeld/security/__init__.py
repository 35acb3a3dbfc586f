"""Who is calling and what they may do: authentication, roles, rate limits, audit (issue 7)."""
