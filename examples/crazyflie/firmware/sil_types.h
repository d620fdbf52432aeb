/* The few types of the Crazyflie firmware that controller_policy.c uses, declared here for a build outside the
   firmware (preflight.py's software in the loop). Inside the firmware, stabilizer_types.h and controller.h declare
   them; the names, fields and units here are theirs:
     position [m] and velocity [m/s] in the world frame (x ahead, y left, z up at take-off), the attitude quaternion
     (x, y, z, w) from body to world, the gyro in deg/s in the body frame, timestamps in ms (a tick of the 1 kHz
     stabilizer loop is a millisecond), and in force mode one normalized force per motor: 0 is off, 1 full thrust. */
#ifndef SIL_TYPES_H
#define SIL_TYPES_H
#include <stdbool.h>
#include <stdint.h>

#define STABILIZER_NR_OF_MOTORS 4
#define RATE_MAIN_LOOP 1000
#define RATE_100_HZ 100
#define RATE_DO_EXECUTE(RATE_HZ, TICK) ((TICK % (RATE_MAIN_LOOP / RATE_HZ)) == 0)

typedef uint32_t stabilizerStep_t;
typedef struct { float x, y, z; } Axis3f;
typedef struct { uint32_t timestamp; float x, y, z; } point_t, velocity_t;
typedef struct { uint32_t timestamp; float x, y, z, w; } quaternion_t;
typedef struct { Axis3f acc; Axis3f gyro; } sensorData_t;
typedef struct { quaternion_t attitudeQuaternion; point_t position; velocity_t velocity; } state_t;
typedef struct { uint32_t timestamp; point_t position; } setpoint_t;
typedef enum { controlModeLegacy = 0, controlModeForceTorque = 1, controlModeForce = 2 } control_mode_t;
typedef struct { float normalizedForces[STABILIZER_NR_OF_MOTORS]; control_mode_t controlMode; } control_t;

#endif
