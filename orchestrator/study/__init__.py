"""Study files: schema, expansion into trials, problems, safe YAML."""
