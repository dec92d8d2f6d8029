"""Planning: keys, the pure cost model and decision list, plans and their learning state, the session, the stores."""
