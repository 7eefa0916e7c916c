"""Deploy: classify images and evaluate any checkpoint or export (`predict`), and write checked exports (`export`)."""
