"""Student releases and autograding of the course with nbgrader (see `assignments.nbgrade`)."""
