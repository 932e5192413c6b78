"""Reading and writing images and weight files, and the errors every stage raises."""
