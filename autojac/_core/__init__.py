"""What every other part needs: errors, the problem facts, byte units, and the evaluator that runs `f`."""
