"""Running a method over the basis: chunks, out-of-memory retries, assembly and verification."""
